"""Conversation templates: messages -> prompt text, prompt ids, or (token ids, loss mask).

render.py: what every template shares (messages, parts -> ids and mask); spec.py: templates described by
data (builtin.json, fastllm and EasyLM LMServer settings); jinja.py: Hugging Face chat templates;
registry.py: the named templates and the choice of a model's template. Imports no torch and nothing of
camelid but errors and the template data.
"""
from .jinja import HFTemplate, template_from_hf
from .registry import (check_template_name, get_template, list_templates, match_model_name, resolve_template,
                       template_for)
from .render import BaseTemplate, Message, Part
from .spec import Template, template_from_fastllm, template_from_lmserver

__all__ = ["Message", "Part", "BaseTemplate", "Template", "HFTemplate", "get_template", "list_templates",
           "match_model_name", "resolve_template", "template_for", "check_template_name", "template_from_hf",
           "template_from_fastllm", "template_from_lmserver"]
