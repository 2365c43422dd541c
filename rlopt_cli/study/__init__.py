"""Many runs and what they show: sweep files into cells (sweep), the sweep folder (sweep_folder), launchers
(local, Ray, SLURM), reports and plots over run folders (report, plots), and the paper study (paper*). Reads
run folders, never a live trainer. May import every stage below it; only `commands` imports it."""
