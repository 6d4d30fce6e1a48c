"""The wording of the synthetic tasks: filler sentences, instruction prefixes and the
needle / query templates of each style (`data.style`).

Two styles:

  natural   full sentences and an instruction prefix (the original format; examples in
            this style are unchanged from before styles existed).
  compact   no prefix and the shortest wording that still reads unambiguously, so that
            every task fits in 64 byte-level tokens with value_digits=3: a tiny model
            trained at a short length still sees whole examples.

In both styles the query repeats the needle's own wording up to the answer ("The value
of abcd is " / "abcd: "), so a small model can answer by matching and copying
(induction). Templates are `str.format` strings: {k} a key or variable name, {v} a
value, {a}/{b} the two variables of an assignment, {n} a count.
"""
from __future__ import annotations

STYLES = ("natural", "compact")

# Natural-ish filler: no digits and none of the needle or query phrases.
FILLER_SENTENCES = (
    " The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.",
    " There and back again.", " A river runs through the quiet valley.",
    " Birds sing in the early morning.", " The old road winds over the hill.",
    " Rain falls softly on the roof.", " A cat sleeps by the warm fire.",
    " The wind moves through the tall trees.", " Boats rest in the small harbor.",
    " The baker opens his shop at dawn.", " Children play in the green park.",
    " Snow covers the distant mountains.", " The library is calm and bright.",
    " A train passes the sleeping town.", " Leaves turn red in the autumn.",
    " The market is busy at noon.", " Stars shine over the dark sea.",
)
RANDOM_ALPHABET = "abcdefghijklmnopqrstuvwxyz "

# The instruction each task's examples start with (after bos), per style.
PREFIXES = {
    "natural": {
        "passkey": "There is a pass key hidden in this text. Find it and remember it.",
        "needle": "Some special values are hidden in this text. Remember them.",
        "assoc_recall": "Remember the value of each key.",
        "var_track": "Some variables are assigned in this text. Follow the assignments.",
        "multi_value": "Several special values of one key are hidden in this text. "
                       "Remember all of them.",
        "common_words": "Below is a list of words. Find the words that appear most often.",
        "frequent_words": "Below is a list of words. Count how often each word appears.",
        "listops": "Evaluate the nested list operations.",
    },
    "compact": {},  # no prefix: every task starts right after bos
}

TEMPLATES = {
    "natural": dict(
        passkey=" The pass key is {v}. Remember it. {v} is the pass key.",
        passkey_query="\nWhat is the pass key? The pass key is ",
        needle=" The value of {k} is {v}.",
        needle_query="\nWhat is the value of {k}? The value of {k} is ",
        var_value=" VAR {a} = {v}.",
        var_hop=" VAR {b} = VAR {a}.",
        var_query="\nWhat is the value of VAR {k}? The value of VAR {k} is ",
        recall="\nRecall:",
        multi_value=" One of the special values for {k} is {v}.",
        multi_query="\nWhat are all the special values for {k}? The special values for "
                    "{k} are ",
        multi_sep=", ",
        common_query="\nWhat are the {n} most common words in the list? Answer:",
        frequent_query="\nWhat are the {n} most frequent words, most frequent first? "
                       "Answer:",
        listops_expr=" {e}",
        listops_query="\nThe value is ",
        end=".",
    ),
    "compact": dict(
        passkey=" Key: {v}.",
        passkey_query="\nKey: ",
        needle=" {k}: {v}.",
        needle_query="\n{k}: ",
        var_value=" {a} = {v}.",
        var_hop=" {b} = {a}.",
        var_query="\n{k} = ",
        recall="\nQ:",
        multi_value=" {k}: {v}.",
        multi_query="\n{k}: ",
        multi_sep=" ",
        common_query="\nCommon:",
        frequent_query="\nTop:",
        listops_expr="{e}",
        listops_query="=",
        end=".",
    ),
}


def prefix(style: str, task: str) -> str:
  """The instruction prefix of `task` in `style` ("" for none)."""
  return PREFIXES[style].get(task, "")
