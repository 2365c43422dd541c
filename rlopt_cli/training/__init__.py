"""One run, top to bottom: the loop (loop), its warm-up stage (warmup), evaluation, the run folder (run_folder,
checkpoint, tracking), the in-training changed fraction (update_fraction) and memory measurement (memory).
May import every stage below it: `algo`, `rollout`, `models`, `tasks`, `config`, `runtime`."""
