"""The spec's engineered-feature SQL, compiled once to Python closures for request rows.

dbt builds `features` in DuckDB with the spec's expressions over columns typed by the spec (numeric ->
DOUBLE, categorical -> VARCHAR, boolean -> BOOLEAN). Running DuckDB per request costs a query per call;
instead each expression is parsed once into a closure that follows DuckDB's semantics for the subset
specs use: + - * / (IEEE: x/0 -> ±inf, 0/0 -> NaN), unary minus, NULL propagation, numeric and string
literals, CAST(x AS DOUBLE|VARCHAR...), replace, nullif, coalesce, greatest/least (skip NULLs, NaN is the
largest), abs, lower, upper, trim. An expression outside the subset is not guessed at: `OnlineFeatures`
runs it in one DuckDB connection per thread, opened once (never a connection per call). The parity test
(tests/test_serving_features.py) checks both against the batch SQL on thousands of rows.
"""

from __future__ import annotations

import math
import re
import threading
from typing import Any, Callable

from mlplatform.spec import DatasetSpec


class NotCompilable(ValueError):
    """The expression uses SQL outside the compiled subset (it then runs in DuckDB)."""


class FeatureValueError(ValueError):
    """A value cannot be converted as the SQL would (DuckDB raises a conversion error): names the column."""

    def __init__(self, column: str, message: str):
        super().__init__(message)
        self.column = column


_TOKEN = re.compile(r"""\s*(?:
    (?P<num>\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+(?:[eE][+-]?\d+)?)
  | (?P<str>'(?:[^']|'')*')
  | (?P<qid>"(?:[^"]|"")*")
  | (?P<id>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>[-+*/(),])
)""", re.X)

_NUMERIC_TEXT = re.compile(r"^\s*[+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|nan|inf|infinity)\s*$",
                           re.I)
_STRING_TYPES = {"varchar", "text", "string"}


def _tokens(sql: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    sql = sql.rstrip()
    while pos < len(sql):
        m = _TOKEN.match(sql, pos)
        if not m or m.end() == pos:
            raise NotCompilable(f"cannot read {sql[pos:pos + 20]!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _to_double(v: Any, col: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        if not _NUMERIC_TEXT.match(v):
            raise FeatureValueError(col, f"could not convert string {v!r} to DOUBLE")
        return float(v.strip())
    raise FeatureValueError(col, f"cannot cast {type(v).__name__} to DOUBLE")


def _div(a, b):
    if a is None or b is None:
        return None
    if b == 0:
        if a == 0 or math.isnan(a):
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)
    return a / b


def _num(op):
    def f(a, b):
        if a is None or b is None:
            return None
        return op(a, b)
    return f


_BINARY = {"+": _num(lambda a, b: a + b), "-": _num(lambda a, b: a - b), "*": _num(lambda a, b: a * b), "/": _div}


def _greatest(*xs):
    vals = [x for x in xs if x is not None]
    if not vals:
        return None
    if any(isinstance(x, float) and math.isnan(x) for x in vals):
        return math.nan
    return max(vals)


def _least(*xs):
    vals = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if vals:
        return min(vals)
    return math.nan if any(x is not None for x in xs) else None


def _nullif(a, b):
    return None if a is not None and b is not None and a == b else a


def _replace(s, old, new):
    if s is None or old is None or new is None:
        return None
    return s.replace(old, new) if old else s


def _strict(fn):
    def f(*xs):
        return None if any(x is None for x in xs) else fn(*xs)
    return f


_FUNCTIONS: dict[str, Callable] = {
    "replace": _replace, "nullif": _nullif, "greatest": _greatest, "least": _least,
    "coalesce": lambda *xs: next((x for x in xs if x is not None), None),
    "abs": _strict(abs), "lower": _strict(str.lower), "upper": _strict(str.upper),
    "trim": _strict(lambda s: s.strip(" ")),
}


class _Parser:
    """Pratt parser producing closures row -> value (row: column name -> value typed as dbt types it)."""

    def __init__(self, sql: str, columns: set[str]):
        self.toks, self.i, self.columns, self.sql = _tokens(sql), 0, columns, sql
        self.used: set[str] = set()

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else ("end", "")

    def take(self, value: str | None = None):
        tok = self.peek()
        if value is not None and tok[1].lower() != value:
            raise NotCompilable(f"expected {value!r}, got {tok[1]!r}")
        self.i += 1
        return tok

    def parse(self):
        fn = self.expr(0)
        if self.peek()[0] != "end":
            raise NotCompilable(f"unexpected {self.peek()[1]!r}")
        return fn

    def expr(self, min_bp: int):
        left = self.atom()
        while True:
            kind, op = self.peek()
            bp = {"+": 10, "-": 10, "*": 20, "/": 20}.get(op) if kind == "op" else None
            if bp is None or bp < min_bp:
                return left
            self.take()
            right = self.expr(bp + 1)
            left = (lambda f, a, b: lambda r: f(a(r), b(r)))(_BINARY[op], left, right)

    def atom(self):
        kind, val = self.take()
        if kind == "num":
            const = float(val) if any(c in val for c in ".eE") else int(val)
            return lambda r: const
        if kind == "str":
            s = val[1:-1].replace("''", "'")
            return lambda r: s
        if kind == "op" and val == "(":
            inner = self.expr(0)
            self.take(")")
            return inner
        if kind == "op" and val == "-":
            inner = self.expr(30)
            return lambda r: None if (x := inner(r)) is None else -x
        if kind == "op" and val == "+":
            return self.expr(30)
        if kind == "qid":
            return self.column(val[1:-1].replace('""', '"'))
        if kind == "id":
            low = val.lower()
            if low == "null":
                return lambda r: None
            if self.peek() == ("op", "("):
                self.take("(")
                if low == "cast":
                    return self.cast()
                if low not in _FUNCTIONS:
                    raise NotCompilable(f"function {val!r} is not in the compiled subset")
                args = [self.expr(0)]
                while self.peek() == ("op", ","):
                    self.take()
                    args.append(self.expr(0))
                self.take(")")
                fn = _FUNCTIONS[low]
                return lambda r: fn(*(a(r) for a in args))
            return self.column(val)
        raise NotCompilable(f"unexpected {val!r}")

    def column(self, name: str):
        match = name if name in self.columns else next((c for c in self.columns if c.lower() == name.lower()), None)
        if match is None:
            raise NotCompilable(f"unknown column {name!r}")
        self.used.add(match)
        return lambda r: r.get(match)

    def cast(self):
        inner = self.expr(0)
        self.take("as")
        kind, typ = self.take()
        self.take(")")
        typ = typ.lower()
        if typ in ("double", "float8"):  # DuckDB's FLOAT/REAL are single precision, DECIMAL is fixed point
            col = ",".join(sorted(self.used)) or "?"
            return lambda r: _to_double(inner(r), col)
        if typ in _STRING_TYPES:
            def to_str(r):
                v = inner(r)
                if v is None or isinstance(v, str):
                    return v
                raise NotCompilable("cast of a non-string to VARCHAR")
            return to_str
        raise NotCompilable(f"cast to {typ} is not in the compiled subset")


def compile_expression(sql: str, columns: set[str]) -> Callable[[dict], Any]:
    """A closure computing `sql` on one row (a dict typed as dbt types it); NotCompilable if outside the subset."""
    return _Parser(sql, columns).parse()


def _finish(v):
    """DuckDB returns DOUBLE for these expressions; ints from integer-only arithmetic are doubles too."""
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise NotCompilable(f"expression gives {type(v).__name__}, not a number")
    return float(v)


class OnlineFeatures:
    """Engineered features for request rows: compiled closures, or one DuckDB connection per thread."""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec
        columns = set(spec.feature_names) | {spec.id_column, spec.time_column}
        self.compiled: dict[str, Callable] = {}
        self.fallback: list = []
        for f in spec.engineered_features:
            try:
                self.compiled[f.name] = compile_expression(f.expression, columns)
            except NotCompilable:
                self.fallback.append(f)
        self._local = threading.local()

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.spec.engineered_features]

    def _duckdb(self):
        con = getattr(self._local, "con", None)
        if con is None:
            import duckdb

            con = self._local.con = duckdb.connect()
        return con

    def _fallback_rows(self, rows: list[dict]) -> list[dict]:
        import pyarrow as pa

        types = {"numeric": pa.float64(), "categorical": pa.string(), "boolean": pa.bool_()}
        table = pa.table({f.name: pa.array([r.get(f.name) for r in rows], type=types[f.type])
                          for f in self.spec.features})
        con = self._duckdb()
        exprs = ", ".join(f'cast({f.expression} as double) as "{f.name}"' for f in self.fallback)
        con.register("request_rows", table)
        try:
            out = con.execute(f"select {exprs} from request_rows").fetchall()
        finally:
            con.unregister("request_rows")
        return [dict(zip([f.name for f in self.fallback], row)) for row in out]

    def compute(self, rows: list[dict]) -> list[list[float]]:
        """Engineered values per row, in the spec's order (NULL -> NaN, as the feature matrix has it)."""
        extra = self._fallback_rows(rows) if self.fallback else None
        out = []
        for i, r in enumerate(rows):
            vals = []
            for f in self.spec.engineered_features:
                if f.name in self.compiled:
                    vals.append(_finish(self.compiled[f.name](r)))
                else:
                    v = extra[i][f.name]
                    vals.append(math.nan if v is None else float(v))
            out.append(vals)
        return out
