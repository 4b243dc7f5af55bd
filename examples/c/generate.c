/*
 * generate.c: the v2l C API end to end.
 *
 * Opens an engine, generates a clip from a first frame and prompt embeddings, then predicts a
 * Video2LoRA LoRA from a reference clip, applies it and generates again. When the data
 * directory holds the frames the Rust API produced for the same request, the program checks
 * that its frames are bitwise equal (capi/tests/c_example.rs does exactly that).
 *
 *   cc -std=c99 -Wall -Icapi/include examples/c/generate.c -Ltarget/debug -lv2l \
 *      -Wl,-rpath,$PWD/target/debug -o generate
 *   ./generate ENGINE_DIR DATA_DIR [MAX_DIFF]
 *
 * DATA_DIR holds raw little-endian files (no parser needed):
 *   params.txt            "frames height width steps seed guidance embed_len embed_dim ref_frames"
 *   first_frame.rgb       height*width*3 bytes (RGB8)
 *   prompt_embeds.f32     embed_len*embed_dim floats; negative_prompt_embeds.f32 likewise
 *   prompt.txt            (optional) prompt text used instead of the embeddings: the engine's
 *                         tokenizer and T5 encoder turn it into them (V2lGenerateParams.prompt)
 *   reference.rgb         ref_frames*height*width*3 bytes
 *   expected_base.rgb, expected_lora.rgb   (optional) frames to compare with
 * and receives out_base.rgb and out_lora.rgb. MAX_DIFF (default 0: bitwise) is the largest
 * difference per byte accepted: under valgrind, whose virtual CPU lacks AVX-512, ONNX Runtime
 * picks other kernels and a few bytes may differ by 1.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "v2l.h"

/* Every call returns a status; on failure v2l_last_error() says what went wrong. */
#define CHECK(call)                                                                  \
    do {                                                                             \
        V2lStatus status_ = (call);                                                  \
        if (status_ != V2L_STATUS_OK) {                                              \
            fprintf(stderr, "error: %s: %s\n", v2l_status_str(status_), v2l_last_error()); \
            goto done;                                                               \
        }                                                                            \
    } while (0)

/* Reads DIR/NAME, which must be exactly `size` bytes; NULL (with a message unless optional). */
static void *read_file(const char *dir, const char *name, size_t size, int optional) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) {
        if (!optional) fprintf(stderr, "error: cannot open %s\n", path);
        return NULL;
    }
    void *buf = malloc(size + 1);
    size_t got = buf ? fread(buf, 1, size + 1, f) : 0;
    fclose(f);
    if (got != size) {
        fprintf(stderr, "error: %s has %zu bytes, expected %zu\n", path, got, size);
        free(buf);
        return NULL;
    }
    return buf;
}

static int write_file(const char *dir, const char *name, const void *data, size_t size) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    int ok = f && fwrite(data, 1, size, f) == size;
    if (f && fclose(f) != 0) ok = 0;
    if (!ok) fprintf(stderr, "error: cannot write %s\n", path);
    return ok;
}

/* 1 when no byte of `got` differs from DIR/NAME by more than max_diff (or there is no file). */
static int compare(const char *dir, const char *name, const uint8_t *got, size_t size, unsigned max_diff) {
    uint8_t *want = read_file(dir, name, size, 1);
    if (!want) {
        printf("%s: not given, not compared\n", name);
        return 1;
    }
    size_t differ = 0, max = 0;
    for (size_t i = 0; i < size; i++) {
        if (got[i] != want[i]) {
            size_t d = got[i] > want[i] ? got[i] - want[i] : want[i] - got[i];
            differ++;
            if (d > max) max = d;
        }
    }
    free(want);
    if (differ) {
        printf("%s: %zu of %zu bytes differ (max %zu)\n", name, differ, size, max);
        return max <= max_diff;
    }
    printf("%s: equal, %zu bytes\n", name, size);
    return 1;
}

/* Progress: called after every denoising step; returning nonzero would cancel. */
static int32_t on_progress(void *user_data, uint32_t step, uint32_t steps) {
    const char *what = user_data;
    printf("  %s: step %u/%u\n", what, step, steps);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: %s ENGINE_DIR DATA_DIR [MAX_DIFF]\n", argv[0]);
        return 2;
    }
    const char *engine_dir = argv[1], *data = argv[2];
    unsigned max_diff = argc == 4 ? (unsigned)strtoul(argv[3], NULL, 10) : 0;
    int result = 1;
    V2lEngine *engine = NULL;
    V2lGenerator *gen = NULL;
    V2lLora *lora = NULL;
    uint8_t *first = NULL, *reference = NULL, *out = NULL;
    float *prompt = NULL, *negative = NULL;

    printf("v2l %s, ABI %u\n", v2l_version(), v2l_abi_version());
    if (v2l_abi_version() != V2L_ABI_VERSION) {
        fprintf(stderr, "error: header ABI %d, library ABI %u\n", V2L_ABI_VERSION, v2l_abi_version());
        return 1;
    }

    unsigned frames, height, width, steps, embed_len, embed_dim, ref_frames;
    unsigned long long seed;
    float guidance;
    char path[4096];
    snprintf(path, sizeof path, "%s/params.txt", data);
    FILE *pf = fopen(path, "r");
    int n = pf ? fscanf(pf, "%u %u %u %u %llu %f %u %u %u", &frames, &height, &width, &steps, &seed,
                        &guidance, &embed_len, &embed_dim, &ref_frames)
               : 0;
    if (pf) fclose(pf);
    if (n != 9) {
        fprintf(stderr, "error: cannot read 9 numbers from %s\n", path);
        return 1;
    }
    size_t frame_bytes = (size_t)height * width * 3, embed_bytes = (size_t)embed_len * embed_dim * sizeof(float);
    first = read_file(data, "first_frame.rgb", frame_bytes, 0);
    prompt = read_file(data, "prompt_embeds.f32", embed_bytes, 0);
    negative = read_file(data, "negative_prompt_embeds.f32", embed_bytes, 0);
    reference = read_file(data, "reference.rgb", ref_frames * frame_bytes, 0);
    if (!first || !prompt || !negative || !reference) goto done;

    /* An engine is immutable and can be shared; a generator is one pipeline (one per thread). */
    V2lEngineOptions options = {0}; /* threads = 0: ONNX Runtime's default */
    CHECK(v2l_engine_open(engine_dir, &options, &engine));
    CHECK(v2l_generator_new(engine, &gen));

    V2lGenerateParams params;
    memset(&params, 0, sizeof params);
    params.frames = frames;
    params.height = height;
    params.width = width;
    params.steps = steps;
    params.guidance = guidance;
    params.seed = seed;
    params.first_frame = first;
    params.first_frame_len = frame_bytes;
    params.prompt_embeds = prompt;
    params.negative_prompt_embeds = negative;
    /* Prompt text instead, when DATA_DIR has prompt.txt (one line, UTF-8). */
    char text[4096] = {0};
    char text_path[4096];
    snprintf(text_path, sizeof text_path, "%s/prompt.txt", data);
    FILE *tf = fopen(text_path, "rb");
    if (tf) {
        size_t n = fread(text, 1, sizeof text - 1, tf);
        fclose(tf);
        while (n > 0 && (text[n - 1] == '\n' || text[n - 1] == '\r')) text[--n] = 0;
        params.prompt = text;
        params.prompt_embeds = NULL;
        params.negative_prompt_embeds = NULL;
    }
    params.embed_len = embed_len;
    params.embed_dim = embed_dim;
    params.noise = NULL; /* seeded noise */

    /* The VAE decides how many frames come out (5 requested frames decode to 8): ask. */
    size_t out_bytes = 0;
    uint32_t out_frames = 0;
    CHECK(v2l_generator_output_size(gen, &params, &out_bytes, &out_frames));
    out = malloc(out_bytes);
    if (!out) goto done;

    /* A too-small buffer is refused with a status and a message, and nothing is written. */
    V2lStatus s = v2l_generator_generate(gen, &params, NULL, NULL, out, out_bytes - 1);
    printf("with a buffer 1 byte short: %s (%s)\n", v2l_status_str(s), v2l_last_error());
    if (s != V2L_STATUS_BUFFER_SIZE) goto done;

    printf("generating %u frames of %ux%u (%u decoded), %u steps\n", frames, width, height, out_frames, steps);
    CHECK(v2l_generator_generate(gen, &params, on_progress, "base", out, out_bytes));
    if (!write_file(data, "out_base.rgb", out, out_bytes)) goto done;
    int same = compare(data, "expected_base.rgb", out, out_bytes, max_diff);

    /* Video2LoRA: a LoRA predicted from a reference clip, applied at scale 1. */
    CHECK(v2l_generator_predict_lora(gen, reference, ref_frames * frame_bytes, ref_frames, height, width, 1.0f, &lora));
    size_t layers = 0;
    CHECK(v2l_lora_layer_count(lora, &layers));
    printf("predicted a LoRA on %zu layers from %u reference frames\n", layers, ref_frames);
    CHECK(v2l_generator_set_lora(gen, lora, 1.0f));
    CHECK(v2l_generator_generate(gen, &params, on_progress, "lora", out, out_bytes));
    if (!write_file(data, "out_lora.rgb", out, out_bytes)) goto done;
    same &= compare(data, "expected_lora.rgb", out, out_bytes, max_diff);
    CHECK(v2l_generator_clear_lora(gen));

    /* Handles are checked on every call: a freed one is refused, not used. */
    CHECK(v2l_lora_free(lora));
    s = v2l_lora_free(lora);
    lora = NULL;
    printf("freeing the LoRA twice: %s (%s)\n", v2l_status_str(s), v2l_last_error());
    if (s != V2L_STATUS_INVALID_HANDLE) goto done;

    result = same ? 0 : 1;
    if (!same)
        printf("FAILED: frames differ\n");
    else if (max_diff)
        printf("ok: frames within %u of the expected ones\n", max_diff);
    else
        printf("ok: frames equal the expected ones\n");

done:
    /* Freeing NULL is a no-op, so one cleanup path serves every exit. */
    v2l_lora_free(lora);
    v2l_generator_free(gen);
    v2l_engine_free(engine);
    free(out);
    free(first);
    free(prompt);
    free(negative);
    free(reference);
    return result;
}
