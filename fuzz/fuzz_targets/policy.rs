#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| keyvault::fuzzing::policy(data));
