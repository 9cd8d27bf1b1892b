"""Words for what the tool prints."""


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``1 image``, ``3 images``: "wrote 1 images" read as a typo in every one-file run."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
