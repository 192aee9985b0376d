"""What tests, benchmarks and the safety campaign share: generated backup folders, real storage
servers, a simulated device, fault-injecting storage and the campaign's scenarios."""

# Key derivation for test repositories only: the format stores the parameters, so these are
# still real repositories; a few ms per unlock instead of 0.06 s keeps the suites fast.
FAST_KDF = {"name": "argon2id", "memory_kib": 8192, "iterations": 1, "lanes": 1}
