"""A multi-turn environment for the distributed tests, loaded as a plugin
(``plugins=[<a copy of this file>]``, copied per test so that each test registers it afresh).

Turns end at any vowel or digit of tiny-random's random bytes; the first turn gets an
observation, the second ends the episode."""

from thinkrl.envs import question_messages, register


@register("chatter")
class Chatter:
    multi_turn = True
    stop = tuple("aeiouAEIOU0123456789")

    def __init__(self, cfg=None):
        self.cfg = cfg

    def reset(self, example):
        return question_messages(example)

    def step(self, messages, turn):
        if any(m["role"] == "assistant" for m in messages):
            return None, None, True, {"reason": "answered"}
        return "[ok]", None, False, {}
