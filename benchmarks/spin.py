"""A CPU-bound task with no imports: it must load inside a subinterpreter (psutil and msgspec cannot)."""


def spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i % 7
    return total
