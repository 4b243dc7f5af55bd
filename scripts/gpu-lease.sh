#!/usr/bin/env bash
# The next GPU lease's measurements (docs/status.md, "What to run on the next GPU") in one call
# of the device tool, which stops a command after 10 minutes. Run where host-run.sh unpacked
# the bundle (the GPU kit's README.md, shared/gpu beside the checkout), e.g. as the last
# upload's command:
#   bash .gpu/p4/host-run.sh -- bash "$PWD/scripts/gpu-lease.sh" effects:2 vae:3 dit:3
# Phases, in the order given, each with its minutes (default: effects:2 vae:3 dit:3):
#   effects  the demo model and fixtures' cuda cases: parity, warm and cold stages against the
#            CPU engine, LoRA switch, CUDA graphs (acceptance items 3 and 4)
#   vae      the real VAE decode (5 latent frames at 60x90), fp32 then bf16, beside PyTorch,
#            then each sweep row as time allows
#   dit      the 5B-width DiT at 17,776 tokens, bf16, bare then with a rank-64 LoRA, beside
#            PyTorch, then each sweep row (attention kernels, GELU forms) as time allows
#   profile  where the bf16 VAE decode's time goes, by operator (blocking launches)
# v2l-bench starts no case after a phase's minutes less one (--budget-min) and is stopped at
# its minutes; a real-size case takes a minute or two (PyTorch's checkpoint and runs, v2l's
# export, compile and runs). Each phase's JSON rows go to $OUT/<phase>.jsonl (printed as each
# case ends, so a stopped phase keeps its finished ones), its stderr to $OUT/<phase>.log; a
# line per row comes last. A phase killed by a signal runs again in its time left with
# V2L_SHARED_ARENA=0 (each session's own arena), as do the phases after it. V2L_LEASE_ARGS
# adds arguments to every v2l-bench call (e.g. `--provider cpu` to rehearse without a GPU).
set -u
phases=()
for a in "$@"; do
  case $a in
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    effects|vae|dit|profile) phases+=("$a:3") ;;
    effects:*|vae:*|dit:*|profile:*)
      m=${a#*:}
      case $m in ''|*[!0-9]*|0*) echo "gpu-lease: $a: minutes must be a whole number from 1" >&2; exit 2 ;; esac
      phases+=("$a") ;;
    *) echo "gpu-lease: unknown argument $a (phases: effects vae dit profile, each as NAME or NAME:MINUTES)" >&2; exit 2 ;;
  esac
done
[ ${#phases[@]} -gt 0 ] || phases=(effects:2 vae:3 dit:3)
[ -x bin/v2l-bench ] || { echo "gpu-lease: no bin/v2l-bench here ($PWD): run it where host-run.sh unpacked the bundle" >&2; exit 2; }
out=${OUT:-$PWD/lease-out}; mkdir -p "$out"
extra=(); [ -n "${V2L_LEASE_ARGS:-}" ] && read -r -a extra <<< "$V2L_LEASE_ARGS"
echo "gpu-lease: ${phases[*]}, rows to $out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu-lease: GPU /'

names=()
for spec in "${phases[@]}"; do
  p=${spec%%:*}; minutes=${spec#*:}
  share=$(( minutes * 60 )); budget=$(( minutes > 1 ? minutes - 1 : 1 ))
  names+=("$p")
  case $p in
    effects) args=(--only effects --repeat 3) ;;
    vae) args=(--only none --scale --scale-only vae-decode --sweep --repeat 3) ;;
    dit) args=(--only none --scale --scale-only "dit bf16 49x" --sweep --repeat 3) ;;
    profile) args=(--only none --scale --scale-only "vae-decode bf16" --profile --repeat 1) ;;
  esac
  start=$(date +%s)
  : > "$out/$p.jsonl"; : > "$out/$p.log"
  # A crash (a signal, not the timeout's stop) with a minute and a half left runs the phase
  # once more with each session's own arena (V2L_SHARED_ARENA=0): the shared device arena is
  # the newest thing no GPU has run, and a crash in it would otherwise cost every phase.
  for try in 1 2; do
    left=$(( share - ($(date +%s) - start) ))
    [ "$try" -eq 1 ] || budget=$(( left / 60 > 1 ? left / 60 - 1 : 1 ))
    echo "gpu-lease: $p: bin/v2l-bench gpu ${args[*]} --json --budget-min $budget ${extra[*]:-}"
    if [ "$p" = profile ]; then
      CUDA_LAUNCH_BLOCKING=1 timeout -k 10 "$left" bin/v2l-bench gpu "${args[@]}" --json --budget-min "$budget" "${extra[@]}" \
        >> "$out/$p.jsonl" 2>> "$out/$p.log"
    else
      timeout -k 10 "$left" bin/v2l-bench gpu "${args[@]}" --json --budget-min "$budget" "${extra[@]}" \
        >> "$out/$p.jsonl" 2>> "$out/$p.log"
    fi
    rc=$?
    case $rc in
      124|137) why=" (stopped at its ${share} s)" ;;
      12[89]|1[3-9][0-9]|2[0-5][0-9]) why=" (killed by signal $(( rc - 128 )))" ;;
      *) why="" ;;
    esac
    echo "gpu-lease: $p: exit $rc$why after $(( $(date +%s) - start )) s, $(grep -c '^{' "$out/$p.jsonl") rows"
    [ "$rc" -eq 0 ] || tail -n 3 "$out/$p.log" | sed "s/^/gpu-lease: $p: /"
    case $rc in 124|137) break ;; esac
    [ "$rc" -ge 128 ] && [ "$try" -eq 1 ] && [ "${V2L_SHARED_ARENA:-}" != 0 ] \
      && [ $(( share - ($(date +%s) - start) )) -ge 90 ] || break
    echo "gpu-lease: $p: again with V2L_SHARED_ARENA=0 (each session's own arena, this phase and later ones), rows appended"
    export V2L_SHARED_ARENA=0
  done
done

# The rows, one line each: what ran, v2l against its baseline, the distance, the kernel.
python3 - "$out" "${names[@]}" <<'PY'
import json, sys, os
out, phases = sys.argv[1], sys.argv[2:]
def f(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"
for p in phases:
    path = os.path.join(out, p + ".jsonl")
    rows = []
    for line in open(path) if os.path.exists(path) else []:
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    print(f"== {p}: {len(rows)} rows")
    for r in rows:
        if "stage" in r:  # a real-size row
            what = f'{r["stage"]} {r["precision"]} {"x".join(map(str, r["size"]))}'
            if r.get("lora_rank"):
                what += f' lora{r["lora_rank"]}'
            line = (f'{what:28} {r["variant"]:20} v2l {f(r.get("v2l_ms"), ".1f")} ms '
                    f'(first {f(r.get("v2l_first_ms"), ".0f")}) torch {f(r.get("torch_same_ms"), ".1f")} '
                    f'ratio {f(r.get("ratio"), ".3f")} rel {f(r.get("v2l_rel_l2_vs_torch_fp32"), ".1e")} '
                    f'peak {f(r.get("v2l_peak_gpu_mb"), ".0f")}/{f(r.get("torch_same_peak_gpu_mb"), ".0f")} MB')
            for k in ("attention_kernel", "not_captured", "v2l_top_ops"):
                if r.get(k):
                    line += f' {k}: {"; ".join(r[k])[:160]}'
            for k in ("error", "torch_error", "skipped"):
                if r.get(k):
                    line += f' {k}: {str(r[k])[:160]}'
        else:  # a model case of the GPU check
            what = f'{r.get("model")} {r.get("backend")} {r.get("precision")}'
            if r.get("skipped"):
                print(f'{what:40} {r["skipped"][:100]}')
                continue
            stages = " ".join(f'{s["stage"]} {f(s.get("engine_ms"), ".1f")}/{f(s.get("cpu_engine_ms"), ".1f")}'
                              for s in r.get("stages", []))
            graph = " ".join(f'{s["stage"]} {f(s.get("engine_ms"), ".1f")}' for s in r.get("graph_stages", []))
            line = (f'{what:40} rel {f(r.get("frames_rel_l2"), ".1e")} ok {r.get("within_bound")} '
                    f'step {f(r.get("dit_step_ms"), ".1f")} ms switch {f(r.get("switch_unfused_ms"), ".1f")} ms '
                    f'merged: switch {f(r.get("switch_bound_ms"), ".1f")} step {f(r.get("bound_step_ms"), ".1f")} ms '
                    f'stages (gpu/cpu ms) {stages}')
            if graph:
                line += f' | cuda graphs: step {f(r.get("graph_dit_step_ms"), ".1f")} {graph}'
            for k in ("graph_not_captured", "graph_error", "error"):
                if r.get(k):
                    line += f' {k}: {str(r[k])[:160]}'
        print(line)
PY
