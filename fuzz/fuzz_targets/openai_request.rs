//! `cargo fuzz run openai_request`: see the `mlx_batch_fuzz` crate.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mlx_batch_fuzz::run_one(data);
});
