"""The seconds each pytest-xdist group of the suite took, from pytest's `--durations=0` report, for
tests/group_seconds.json (conftest hands the groups to the workers longest first):

    bash launch/test.sh --durations=0 | tee suite.log
    python tests/group_seconds.py suite.log > tests/group_seconds.json
"""
import json
import re
import sys
from collections import defaultdict

LINE = re.compile(r"^([0-9.]+)s (?:setup|call|teardown)\s+\S+@(\S+)$")


def group_seconds(lines) -> dict[str, float]:
    seconds: dict[str, float] = defaultdict(float)
    for line in lines:
        match = LINE.match(line.strip())
        if match:
            seconds[match.group(2)] += float(match.group(1))
    return {group: round(s, 1) for group, s in sorted(seconds.items(), key=lambda item: (-item[1], item[0]))}


if __name__ == "__main__":
    with open(sys.argv[1]) as log:
        print(json.dumps(group_seconds(log), indent=1))
