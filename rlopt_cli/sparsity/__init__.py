"""`rlopt sparsity`: which coordinates changed between two checkpoints (compare), counted exactly per tensor slice
(count), read one tensor at a time from safetensors (weights). Reads files only; may import `training` (the run
folder's layout) and the stages below it."""
