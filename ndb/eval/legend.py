"""What each edit metric counts, in one line each: for ``ndb eval --help`` and the README.

Kept apart from the metrics themselves so that the command line can show it without
importing torch.
"""

TEACHER_FORCED = {
    "efficacy": "rewrite prompt: the new object's NLL beats the true one's",
    "generalization": "same, on the paraphrases",
    "specificity": "neighborhood prompts: the true object's NLL beats the new one's",
}

GENERATIVE = {
    "gen_efficacy": "greedy continuation of the rewrite prompt mentions the new object",
    "gen_generalization": "same, for the paraphrases",
    "gen_specificity": "neighborhood prompt's continuation mentions the true object and not "
                       "the new one",
    "chat": "chat answer to the fact's question mentions the new object",
    "chat_known": "chat, over the facts whose true object the unedited model's chat answer "
                  "mentions",
    "chat_true": "chat answer mentions the true (old) object",
    "groups_hold": "groups (edits of one subject) in which every rewrite continuation "
                   "mentions its new object",
    "cross_talk": "(edit, other edit of its subject) pairs where the first edit's rewrite "
                  "continuation or chat answer mentions the other's new object",
    "cross_answer": "same pairs, where that continuation or answer gives the other's new "
                    "object as its answer: names it before its own new object, or without it",
    "spill_subject": "continuations of the subject's unedited relations that mention a new "
                     "object of the subject's edits",
    "spill_neighbors": "neighborhood continuations that mention the new object",
}
