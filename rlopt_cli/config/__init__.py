"""Recipes become configs: the frozen, validated `RunConfig` (schema), TOML recipes and dotted overrides in and
out (recipes), and the optimizer registry as data (optimizers). No torch. May import `runtime` and `errors`."""
