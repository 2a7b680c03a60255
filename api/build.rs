//! Compiles the protobuf contracts into OUT_DIR with a pure-Rust protobuf compiler (protox),
//! so that no system `protoc` is needed, plus a descriptor set for server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/kubemoe/inference/v1/inference.proto", "proto/kubemoe/expert/v1/expert.proto"];
    let fds = protox::compile(files, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("kubemoe_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    // Activations as `bytes::Bytes`: decoded without a copy, shared without a copy. Malformed
    // messages are the caller's error (`codec.rs`).
    tonic_prost_build::configure()
        .bytes(".kubemoe.expert.v1")
        .codec_path("crate::codec::Codec")
        .compile_fds(fds)?;
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    Ok(())
}
