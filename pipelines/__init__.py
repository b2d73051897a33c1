"""What we do with models, a folder per stage: data/, training/, registry/, batch/, evaluation/.
Each stage is a plain function taking a typed config; `workflows` chains them (search -> register,
pull -> run) for the CLI (`pipelines.cli`, the `vaepipe` command) and jobs/ alike."""
