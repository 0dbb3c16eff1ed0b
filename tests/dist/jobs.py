"""The `then` form of the scripts here: several jobs in one launch (one start-up for all of them)."""


def split_then(args: list[str]) -> list[list[str]]:
    """`A B then C then D E` -> [[A, B], [C], [D, E]]."""
    jobs: list[list[str]] = [[]]
    for arg in args:
        if arg == "then":
            jobs.append([])
        else:
            jobs[-1].append(arg)
    return jobs
