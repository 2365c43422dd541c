"""The process's environment, below every stage: CPU-kernel pinning (set before torch loads), devices and
autocast, peak memory, and files written atomically. May import only `rlopt_cli.errors`."""
