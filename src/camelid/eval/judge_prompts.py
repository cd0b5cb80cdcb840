"""Judge prompts, in our own words, with the fields and verdict formats of FastChat's MT-bench judge:
single-answer grading ends in "[[rating]]" (1-10), pairwise comparison in "[[A]]", "[[B]]" or "[[C]]" (tie).
Multi-turn variants show the whole conversation and ask about the second answer; reference variants
add a reference answer for questions that have one (math, reasoning, coding)."""
from __future__ import annotations

SYSTEM_SINGLE = "You grade the answers of AI assistants. You are fair, careful and brief."
SYSTEM_PAIR = "You compare the answers of two AI assistants. You are fair, careful and brief."

_SINGLE_ASK = ("Judge how good the AI assistant's answer to the user's question below is: how helpful, relevant "
               "and accurate it is, whether it goes deep enough, and how detailed and (where that helps) creative it "
               "is. {ref_rule}Explain your judgement in a few sentences and stay objective. Then give a score from "
               "1 (worst) to 10 (best), written exactly like this: \"[[rating]]\", for example \"Rating: [[6]]\".")
_PAIR_ASK = ("Compare the answers of two AI assistants to the user's question below and decide which one follows "
             "the user's instructions and answers the question better: more helpful, relevant, accurate, deep, "
             "detailed and (where that helps) creative. {ref_rule}Explain your comparison in a few sentences. Do "
             "not let the order in which the answers appear, their length or the assistants' names sway you; be "
             "as objective as you can. Then give your verdict, written exactly like this: \"[[A]]\" if assistant A "
             "is better, \"[[B]]\" if assistant B is better, \"[[C]]\" for a tie.")
_REF_RULE = ("A reference answer is given: compare with it, and point out and correct any mistakes in the "
             "assistant's work. ")
_SECOND = "Judge only the assistant's answer to the user's second question. "


def _block(title: str, text: str) -> str:
    return f"[The Start of {title}]\n{text}\n[The End of {title}]"


def _conversation(name: str, questions: list[str], answers: list[str]) -> str:
    lines = [f"<|The Start of {name}'s Conversation with User|>"]
    for q, a in zip(questions, answers):
        lines += ["", "### User:", q, "", f"### {name}:", a]
    lines += ["", f"<|The End of {name}'s Conversation with User|>"]
    return "\n".join(lines)


def single_prompt(questions: list[str], answers: list[str], turn: int, reference: list[str] | None = None) -> tuple[str, str]:
    """(system, user) asking for a 1-10 rating of the answer to turn `turn` (0-based)."""
    ref_rule = _REF_RULE if reference else ""
    if turn == 0:
        body = [_SINGLE_ASK.format(ref_rule=ref_rule), "", "[Question]", questions[0], ""]
        if reference:
            body += [_block("Reference Answer", reference[0]), ""]
        body.append(_block("Assistant's Answer", answers[0]))
    else:
        body = [_SINGLE_ASK.format(ref_rule=ref_rule + _SECOND), ""]
        if reference:
            body += [_conversation("Reference", questions[:turn + 1], reference[:turn + 1]), ""]
        body.append(_conversation("Assistant", questions[:turn + 1], answers[:turn + 1]))
    return SYSTEM_SINGLE, "\n".join(body)


def pair_prompt(questions: list[str], answers_a: list[str], answers_b: list[str], turn: int,
                reference: list[str] | None = None) -> tuple[str, str]:
    """(system, user) asking which of two answers to turn `turn` is better."""
    ref_rule = _REF_RULE if reference else ""
    if turn == 0:
        body = [_PAIR_ASK.format(ref_rule=ref_rule), "", "[User Question]", questions[0], ""]
        if reference:
            body += [_block("Reference Answer", reference[0]), ""]
        body += [_block("Assistant A's Answer", answers_a[0]), "", _block("Assistant B's Answer", answers_b[0])]
    else:
        body = [_PAIR_ASK.format(ref_rule=ref_rule + _SECOND.replace("the assistant's answer",
                                                                    "the assistants' answers")), ""]
        if reference:
            body += [_conversation("Reference", questions[:turn + 1], reference[:turn + 1]), ""]
        body += [_conversation("Assistant A", questions[:turn + 1], answers_a[:turn + 1]), "",
                 _conversation("Assistant B", questions[:turn + 1], answers_b[:turn + 1])]
    return SYSTEM_PAIR, "\n".join(body)
