"""Fine-tuning data the Koala way: readers for its seven sources (sources.py, html.py), its filters (filters.py),
mixtures and a train/eval split (prepare.py); and raw text tokenized for pre-training (tokenize.py).

`camelid data prepare` writes conversation JSONL records `{id, source, messages: [{role, content}], preferred}`
(train.jsonl, eval.jsonl) and manifest.json with the counts of every source and filter. The commands live in
commands/data.py.
"""
