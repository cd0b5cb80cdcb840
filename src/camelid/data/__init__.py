"""Fine-tuning data the Koala way: readers for its seven sources, its filters, mixtures, a train/eval split.

`camelid data prepare` writes conversation JSONL records `{id, source, messages: [{role, content}], preferred}`
(train.jsonl, eval.jsonl) and manifest.json with the counts of every source and filter.
"""
from .prepare import add_arguments, cmd_prepare, prepare
from .sources import READERS, Conversation

__all__ = ["READERS", "Conversation", "add_arguments", "cmd_prepare", "prepare"]
