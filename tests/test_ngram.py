"""The context n-gram guard against a pure-Python reference that scans the context at every position."""

import random

import pytest
import torch

from costeer_processor.core import ngram
from costeer_processor.core.ngram import NgramGuard


def grams_of(ids, n):
    return {tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)}


def ref_banned(n, context, public, tail):
    """Tokens t such that tail + (t,) is an n-gram of the context and not of the public ids."""
    public_grams = grams_of(public, n)
    tail = tuple(tail)
    return {context[i + n - 1] for i in range(len(context) - n + 1)
            if tuple(context[i:i + n - 1]) == tail and tuple(context[i:i + n]) not in public_grams}


def tail_of(history, n):
    tail = list(history[-(n - 1):]) if n > 1 else []
    return [-1] * (n - 1 - len(tail)) + tail


def random_case(rng, vocab=7, length=60):
    """Mostly a 7-token vocabulary (repeated n-grams), with rare tokens up to 20."""
    context = [rng.randrange(vocab) if rng.random() < 0.85 else rng.randrange(vocab, 20) for _ in range(length)]
    public = context[5:20] + [rng.randrange(vocab) for _ in range(20)] + context[30:38]
    return context, public


def queries(rng, n, contexts, publics, count=40, vocab=7):
    """(slot, tail) pairs: tails taken from the context (hits), the public ids, random, and -1 padded."""
    slots, tails = [], []
    for _ in range(count):
        slot = rng.choice(list(contexts))
        source = rng.choice([contexts[slot], publics[slot], [rng.randrange(vocab) for _ in range(n + 3)]])
        end = rng.randrange(0, len(source) + 1)
        slots.append(slot)
        tails.append(tail_of(source[:end], n))
    return slots, tails


def as_tensors(slots, tails, n):
    return torch.tensor(slots, dtype=torch.long), torch.tensor(tails, dtype=torch.long).reshape(len(slots), n - 1)


def check_banned(guard, n, contexts, publics, slots, tails):
    rows, toks = guard.banned(*as_tensors(slots, tails, n))
    got = list(zip(rows.tolist(), toks.tolist()))
    assert len(got) == len(set(got)), "pairs must be distinct"
    want = {(r, t) for r, (s, tail) in enumerate(zip(slots, tails))
            for t in ref_banned(n, contexts[s], publics[s], tail)}
    assert set(got) == want
    return want


@pytest.mark.parametrize("n", range(1, 7))
@pytest.mark.parametrize("seed", range(3))
def test_banned_matches_reference(n, seed):
    rng = random.Random(seed * 10 + n)
    guard = NgramGuard(n)
    contexts, publics = {}, {}
    for slot in (0, 3, 7):  # several slots at once, different contexts, repeated n-grams (vocab 7)
        contexts[slot], publics[slot] = random_case(rng)
        guard.add(slot, contexts[slot], publics[slot])
    slots, tails = queries(rng, n, contexts, publics)
    want = check_banned(guard, n, contexts, publics, slots, tails)
    if n <= 4:
        assert want, "the case should ban something"


@pytest.mark.parametrize("n", [1, 2, 4])
def test_apply_masks_exactly_the_reference_and_ignores_ids_beyond_vocab(n):
    rng = random.Random(n)
    guard = NgramGuard(n)
    contexts, publics = {}, {}
    for slot in (1, 2):
        contexts[slot] = [rng.randrange(12) for _ in range(80)]
        publics[slot] = contexts[slot][:10]
        guard.add(slot, contexts[slot], publics[slot])
    slots, tails = queries(rng, n, contexts, publics, count=30, vocab=12)
    V = 9  # ids 9..11 of the context lie beyond the vocabulary
    logprobs = torch.log_softmax(torch.randn(len(slots), V), -1)
    expected = logprobs.clone()
    for r, (s, tail) in enumerate(zip(slots, tails)):
        for t in ref_banned(n, contexts[s], publics[s], tail):
            if t < V:
                expected[r, t] = float("-inf")
    out = guard.apply(logprobs, *as_tensors(slots, tails, n))
    assert out is logprobs  # in place
    assert torch.equal(out, expected)
    assert guard.stats()["masked"] == int(torch.isneginf(expected).sum())


def test_prompt_ngrams_are_not_banned():
    guard = NgramGuard(2)
    guard.add(0, context_ids=[1, 2, 3, 4], public_ids=[9, 2, 3])
    slots = torch.tensor([0, 0, 0])
    rows, toks = guard.banned(slots, torch.tensor([[1], [2], [3]]))
    assert sorted(zip(rows.tolist(), toks.tolist())) == [(0, 2), (2, 4)]  # "2 3" is public


def test_n1_bans_context_tokens_absent_from_the_public_ids_everywhere():
    guard = NgramGuard(1)
    guard.add(4, context_ids=[5, 6, 7, 5], public_ids=[6, 8])
    rows, toks = guard.banned(torch.tensor([4, 4, 2]), torch.zeros(3, 0, dtype=torch.long))
    assert sorted(zip(rows.tolist(), toks.tolist())) == [(0, 5), (0, 7), (1, 5), (1, 7)]


def test_tails_padded_with_minus_one_match_nothing():
    guard = NgramGuard(3)
    guard.add(0, [1, 2, 3, 1, 2, 4], [])
    rows, _ = guard.banned(torch.tensor([0, 0, 0]), torch.tensor([[-1, 1], [-1, -1], [1, -1]]))
    assert rows.numel() == 0
    rows, toks = guard.banned(torch.tensor([0]), torch.tensor([[1, 2]]))
    assert sorted(toks.tolist()) == [3, 4]


@pytest.mark.parametrize("n", [1, 3])
def test_remove_add_churn_and_slot_reuse(n):
    rng = random.Random(5)
    guard = NgramGuard(n)
    contexts, publics = {}, {}
    for step in range(40):
        if contexts and rng.random() < 0.4:
            slot = rng.choice(list(contexts))
            guard.remove(slot)
            del contexts[slot], publics[slot]
            assert slot not in guard
        else:
            slot = rng.randrange(6)  # often reused by another context
            contexts[slot], publics[slot] = random_case(rng, length=rng.randrange(0, 50))
            guard.add(slot, contexts[slot], publics[slot])
            assert slot in guard
        if contexts and step % 3 == 0:
            check_banned(guard, n, contexts, publics, *queries(rng, n, contexts, publics, count=20))
    assert len(guard) == len(contexts)
    guard.clear()
    assert len(guard) == 0 and guard.stats()["prefixes"] == 0


@pytest.mark.parametrize("n", [1, 2, 5])
def test_forced_hash_collisions_still_give_exact_results(n, monkeypatch):
    monkeypatch.setattr(ngram, "_hash", lambda slots, grams: torch.zeros(len(slots), dtype=torch.long))
    rng = random.Random(n)
    guard = NgramGuard(n)
    contexts, publics = {}, {}
    for slot in (0, 1, 2):
        contexts[slot], publics[slot] = random_case(rng)
        guard.add(slot, contexts[slot], publics[slot])
    check_banned(guard, n, contexts, publics, *queries(rng, n, contexts, publics))


def test_a_row_with_every_finite_entry_banned_is_left_alone():
    guard = NgramGuard(1)
    guard.add(0, [2, 3], [])
    inf = float("-inf")
    logprobs = torch.tensor([[inf, inf, 0.0, -1.0], [-2.0, inf, -0.1, -3.0]])
    out = guard.apply(logprobs.clone(), torch.tensor([0, 0]), torch.zeros(2, 0, dtype=torch.long))
    assert torch.equal(out[0], logprobs[0])  # would be all -inf: left as it was
    assert out[1].tolist() == [-2.0, inf, inf, inf]
    assert guard.stats()["exhausted"] == 1 and guard.stats()["masked"] == 2
    assert guard.fired(0) == 1  # row 1: argmax 2 was banned; row 0 is counted as exhausted only


def test_fired_counts_and_reset_on_add():
    guard = NgramGuard(2)
    guard.add(0, [1, 2], [])
    guard.add(1, [1, 3], [])
    logprobs = torch.zeros(2, 5)
    logprobs[:, 2] = 1.0
    slots, tails = torch.tensor([0, 1]), torch.tensor([[1], [1]])
    for _ in range(3):
        guard.apply(logprobs.clone(), slots, tails)
    assert (guard.fired(0), guard.fired(1), guard.fired(9)) == (3, 0, 0)
    assert guard.stats()["fired"] == 3 and guard.stats()["masked"] == 6
    guard.add(0, [4, 4], [])
    assert guard.fired(0) == 0


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_greedy_generation_never_emits_a_private_ngram(n):
    rng = random.Random(n)
    g = torch.Generator().manual_seed(n)
    V, batch = 30, 4
    contexts = {s: [rng.randrange(V) for _ in range(200)] for s in range(batch)}
    prompts = {s: contexts[s][50:60] + [rng.randrange(V) for _ in range(5)] for s in range(batch)}

    follow = {s: [[c[i + 1] for i in range(len(c) - 1) if c[i] == t] for t in range(V)] for s, c in contexts.items()}

    follow2 = {s: {} for s in contexts}
    for s, c in contexts.items():
        for i in range(len(c) - 2):
            follow2[s].setdefault((c[i], c[i + 1]), []).append(c[i + 2])

    def generate(guard):
        histories = [list(prompts[s]) for s in range(batch)]
        for _ in range(60):
            logits = torch.randn(batch, V, generator=g)
            for s, h in enumerate(histories):  # a model that wants to copy its context
                logits[s, follow[s][h[-1]]] += 5.0
                logits[s, follow2[s].get(tuple(h[-2:]), [])] += 5.0
            logprobs = torch.log_softmax(logits, -1)
            if guard is not None:
                tails = torch.tensor([tail_of(h, n) for h in histories], dtype=torch.long).reshape(batch, n - 1)
                guard.apply(logprobs, torch.arange(batch), tails)
            assert torch.isfinite(logprobs).any(-1).all()
            for s, t in enumerate(logprobs.argmax(-1).tolist()):
                histories[s].append(t)
        return histories

    def leaks(histories):
        count = 0
        for s, h in enumerate(histories):
            private = grams_of(contexts[s], n) - grams_of(prompts[s], n)
            start = len(prompts[s])
            count += sum(tuple(h[i - n + 1:i + 1]) in private for i in range(max(start, n - 1), len(h)))
        return count

    guard = NgramGuard(n)
    for s in range(batch):
        guard.add(s, contexts[s], prompts[s])
    assert leaks(generate(None)) > 0  # the test has teeth
    assert leaks(generate(guard)) == 0
    assert guard.stats()["fired"] > 0


def test_zero_is_off_and_arguments_are_checked():
    off = NgramGuard(0)
    off.add(0, [1, 2, 3], [])
    logprobs = torch.zeros(1, 4)
    assert torch.equal(off.apply(logprobs, torch.tensor([0]), torch.zeros(1, 0, dtype=torch.long)), torch.zeros(1, 4))
    for bad in (True, -1, 2.0, "3"):
        with pytest.raises(ValueError, match="n must"):
            NgramGuard(bad)
    guard = NgramGuard(2)
    with pytest.raises(ValueError, match="slot must"):
        guard.add(True, [1], [])
    with pytest.raises(ValueError, match="slot must"):
        guard.add(-1, [1], [])
    with pytest.raises(ValueError, match="context ids >= 0"):
        guard.add(0, [1, -2], [])
    with pytest.raises(ValueError, match="tails"):
        guard.banned(torch.tensor([0]), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="flat"):
        guard.add(0, [[[1, 2]]], [])  # one level of nesting is several sequences; two is an error
    with pytest.raises(ValueError, match="flat"):
        guard.add(0, [1, 2], [[1]])
    guard.add(0, torch.tensor([1]), torch.tensor([], dtype=torch.long))  # shorter than n: nothing to ban
    assert guard.banned(torch.tensor([0]), torch.tensor([[1]]))[0].numel() == 0


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_several_context_sequences_ban_each_ones_ngrams_never_across_them(n):
    rng = random.Random(10 + n)
    seqs = [[rng.randrange(12) for _ in range(rng.randrange(0, 15))] for _ in range(4)]
    public = [rng.randrange(12) for _ in range(10)]
    guard = NgramGuard(n)
    guard.add(0, seqs, public)
    for _ in range(200):
        tail = [rng.randrange(-1, 12) for _ in range(n - 1)]
        want = set().union(*(ref_banned(n, s, public, tail) for s in seqs))
        _, ids = guard.banned(torch.tensor([0]), torch.tensor([tail], dtype=torch.long).reshape(1, n - 1))
        assert set(ids.tolist()) == want  # the union of each sequence's bans: nothing across two of them


def test_surface_forms_cover_a_copy_that_starts_a_sentence():
    forms = ngram.surface_forms("I'm a paramedic on night shifts. I read answers", 4)
    assert forms[0] == "I'm a paramedic on night shifts. I read answers"
    assert "Paramedic on night shifts." in forms and " Paramedic on night shifts." in forms
    assert "Night shifts. I read" in forms and " Night shifts. I read" in forms
    assert " i'm a paramedic on" in forms  # a capitalised word: the lower-case form after a space
    assert all(len(f.split()) <= 4 for f in forms[1:])
    assert ngram.surface_forms("", 4) == [""]
