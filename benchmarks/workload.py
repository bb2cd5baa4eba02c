"""The prompts and personal contexts every benchmark uses (one list, so their numbers compare)."""

PROMPTS = [
    "Suggest a dinner recipe for tonight.", "Plan a weekend trip for me.", "Recommend a book to read.",
    "Write a short poem about autumn.", "How should I start learning to code?", "Give me a workout plan.",
    "What gift should I buy for a friend?", "Describe a perfect morning routine.",
]
CONTEXTS = [
    "I am vegan and I love very spicy food.", "I hate crowds and love mountains.", "I only read science fiction.",
    "I like funny, rhyming verse.", "I am a retired carpenter who likes practical examples.",
    "I have a bad knee and no gym.", "My friend loves tea and gardening.", "I wake up at 5am and meditate.",
]


def long_context(context: str, user: int, tok, n_tokens: int) -> str:
    """A user profile of about ``n_tokens`` tokens (LongLaMP-length personal contexts: 1,000-3,000)."""
    lines = [f"Profile of user {user}."]
    k = 0
    while len(tok(" ".join(lines), add_special_tokens=False)["input_ids"]) < n_tokens:
        k += 1
        lines.append(f"Record {k}: {context}")
    return " ".join(lines)
