"""Word frequencies of a text: the most common words first."""

import re
from collections import Counter

from conveyor import task

WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


@task(timeout_s=10)
def wordcount(text: str, top: int = 10) -> list[list]:
    words = [word.lower() for word in WORD.findall(text)]
    print(f"counted {len(words)} words")
    return [[word, count] for word, count in Counter(words).most_common(top)]
