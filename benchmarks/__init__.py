"""rlopt's performance benchmarks: side-by-side ratios against TRL and against physical limits (`make bench`)."""
