"""Models and tokenizers: a local Hugging Face folder, or the embedded tiny model built from a transformers config
(loading), and the KV caches that let a group share its prompt's forward (prompt_cache). Loading never trains:
the embedded model's warm-up is a training stage (rlopt_cli/training/warmup.py). May import `config`, `runtime`."""
