//! Compiles `ringcache/v1/*.proto` with protox (pure Rust, no system `protoc`)
//! and generates the tonic stubs. The encoded descriptor set, with source
//! comments, is written to `OUT_DIR` for server reflection, so that
//! `grpcurl describe` shows the documentation in the `.proto` files.

use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "ringcache/v1/cache.proto",
    "ringcache/v1/cluster.proto",
    "ringcache/v1/internal.proto",
    "ringcache/v1/node.proto",
    "google/rpc/status.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }

    let mut compiler = protox::Compiler::new(["."])?;
    compiler.include_source_info(true).include_imports(true);
    compiler.open_files(PROTOS)?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("ringcache_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        // Values are `bytes::Bytes`, so they move between decode buffers,
        // the store and encode buffers without copies where possible.
        .bytes(".ringcache.v1")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
