"""A conversation with a model: its chat template rendered as transformers'
apply_chat_template renders it (Jinja in a sandbox, via jinja2), each reply sampled
a token at a time over the KV cache and streamed; the cache keeps the conversation,
so a turn runs only the tokens the template adds after what is cached."""
import datetime
import json

import numpy as np

from trainer.errors import ConfigError
from trainer.sample import Sampler, pick

# for a model without a template of its own (GPT-2): one plain, documented form
# (each reply ends with EOS, so a model fine-tuned on it learns where to stop)
PLAIN_TEMPLATE = ("{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}"
                  "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n\n"
                  "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
STOPS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>")


def compile_template(source):
    """A chat template -> a function (messages, add_generation_prompt, **specials) -> text."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    try:
        template = env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise ConfigError(f"the chat template does not compile: {e}") from None

    def render(messages, add_generation_prompt, **specials):
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **specials)
        except jinja2.exceptions.TemplateError as e:
            raise ConfigError(f"the chat template failed: {e}") from None
    return render


def specials_of(tokenizer):
    """The special tokens a template may write: {"bos_token": text, "eos_token": text}."""
    return {f"{kind}_token": tokenizer.decode([i]) for kind, i in
            (("bos", tokenizer.bos), ("eos", tokenizer.eos)) if i is not None}


def template_of(tokenizer):
    """The tokenizer's chat template, or the plain one."""
    return tokenizer.chat_template() or PLAIN_TEMPLATE


class Chat:
    """The conversation so far with the model `cfg`, `tensors` (its context capped at
    `context` tokens), spoken through `tokenizer` and `template` (its source)."""

    def __init__(self, cfg, tensors, tokenizer, template, context):
        import dataclasses
        self.context, self.tokenizer = min(context, cfg.block_size), tokenizer
        self.sampler = Sampler(dataclasses.replace(cfg, block_size=self.context), tensors)
        self.render = compile_template(template)
        self.specials = specials_of(tokenizer)
        self.stops = {tokenizer.eos} | {i for i in map(tokenizer.token_id, STOPS) if i is not None}
        self.messages, self.cached = [], []

    def say(self, role, content):
        self.messages.append({"role": role, "content": content})

    def reply(self, choose, write, max_new_tokens):
        """The assistant's next message, each token chosen by choose(logits) and each
        piece of text passed to write as soon as its characters are whole."""
        ids = self.prompt(max_new_tokens)
        same = next((i for i, (a, b) in enumerate(zip(ids, self.cached)) if a != b), min(len(ids), len(self.cached)))
        same = min(same, len(ids) - 1)  # at least one token runs, for the logits
        logits = self.sampler.forward(ids[same:], same)
        new, shown = [], ""
        while len(new) < max_new_tokens:
            token = choose(logits)
            if token in self.stops:
                break
            new.append(token)
            text = self.tokenizer.decode(new)
            if not text.endswith("\ufffd"):  # a character's bytes all in
                write(text[len(shown):])
                shown = text
            if len(ids) + len(new) >= self.context:
                break
            logits = self.sampler.forward([token], len(ids) + len(new) - 1)
        self.cached = ids + new
        text = self.tokenizer.decode(new)
        write(text[len(shown):])
        self.say("assistant", text)
        return text

    def prompt(self, room):
        """The conversation's tokens with the assistant's turn opened; the oldest turns
        (after a system message) leave while it and `room` new tokens exceed the context."""
        while True:
            ids = self.tokenizer.encode_rendered(self.render(self.messages, True, **self.specials))
            first = 1 if self.messages[0]["role"] == "system" else 0
            if len(ids) + min(room, self.context // 2) <= self.context or len(self.messages) - first <= 1:
                break
            del self.messages[first:first + 2]
        if len(ids) >= self.context:
            raise ConfigError(f"the message needs {len(ids)} tokens, more than the context of {self.context}")
        return ids


def chooser(temperature, top_k, top_p, seed):
    """-> choose(logits): greedy at temperature 0, else sampled from the top_k tokens
    (0: all) within the nucleus of probability top_p, reproducibly from seed."""
    rng = np.random.default_rng(seed)

    def choose(logits):
        if temperature == 0 or top_p >= 1:
            return pick(logits, temperature, top_k, rng)
        scaled = logits.astype(np.float64) / temperature
        order = np.argsort(-scaled)
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        keep = order[:int(np.searchsorted(np.cumsum(probs), top_p)) + 1]
        masked = np.full_like(logits, -np.inf)
        masked[keep] = logits[keep]
        return pick(masked, temperature, top_k, rng)
    return choose
