"""What we do with models: data, train, tune, registry, generate, evaluate. Each stage is a
plain function taking a typed config; `pipelines.cli` is the `vaepipe` command over them."""
