"""Training data: read the recipe's sources, check every row, map them to the one schema TRL trains on.

One concern per module; callers import from the module that owns the function:

  sources      reading files, folders, `save_to_disk` folders and Hub datasets; line-level bad rows
  formats      alpaca, sharegpt, messages, prompt_completion, text mapped to one schema; row checks; Rows
  loading      load_rows: every source read, mapped and checked, then mixed, deduplicated and shuffled
  templates    the built-in chat templates, applying the recipe's choice to the tokenizer, rendering every chat
  cache        build_dataset: the rows as the DatasetDict TRL trains on, cached on disk by content
  preparation  TRL's own preparation through a carrier model, token stats, the loud checks before a model loads
  report       what `qtune data` prints

Bad rows stop with file + row (or are skipped, counted); before any model loads, the prepared data is checked
for the silent killers (end-of-turn never trained, untrained examples, a built-in template that renders
differently from the tokenizer's own). Knows nothing about the training loop.
"""
