#[test]
fn dump() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cogvideox-tiny/vae");
    let ck = v2l_export::Checkpoint::open_dir(&dir).unwrap();
    let vae = v2l_export::cogvideox_vae::export(&ck).unwrap();
    v2l_graphs::save(&vae.encoder, std::path::Path::new("/tmp/vae_check/enc.onnx"), v2l_graphs::ExternalData::Never).unwrap();
    v2l_graphs::save(&vae.decoder, std::path::Path::new("/tmp/vae_check/dec.onnx"), v2l_graphs::ExternalData::Never).unwrap();
}
