"""qtune: QLoRA fine-tuning from one YAML recipe.

    import qtune
    recipe = qtune.load_recipe("recipes/llama2-qlora.yaml", {"training.max_steps": 100})
    run = qtune.train(recipe)
    qtune.merge(run)
    print(qtune.generate(run, "Hello"))

The API (qtune/api.py) loads on first use (PEP 562): `import qtune` imports neither torch nor pydantic, so
`qtune --help` and `accelerate launch qtune …` (which runs this package's folder) stay instant.
"""

__version__ = "0.1.0"

# The names qtune.api provides, loaded on first access.
__all__ = ["QtuneError", "Recipe", "RunDir", "evaluate", "generate", "load_recipe", "merge", "open_run", "train"]


def __getattr__(name: str):
    if name in __all__:
        from qtune import api

        value = getattr(api, name)
        globals()[name] = value  # found directly from now on
        return value
    raise AttributeError(f"module 'qtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
