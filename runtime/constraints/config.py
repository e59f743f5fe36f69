"""Limits and JSON options for constraint compilation: one frozen, validated dataclass.

Every bound a client's constraint can push against lives here, so an operator can tighten them
in one place: the size of the constraint text, the number of choices, llguidance's grammar-size
and "fuel" limits (fuel bounds the work of building the lexer at compile time and of each mask
computation, which is what bounds compile time: llguidance has no wall-clock limit), the cap on
free whitespace in JSON, the size of the compiled-grammar cache, and optional bounds on JSON
strings, arrays and objects.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


# The optional JSON bounds (None = off); see ConstraintLimits.
_JSON_BOUNDS = ("json_max_string_length", "json_max_items", "json_max_properties", "json_max_integer_digits")


@dataclass(frozen=True)
class ConstraintLimits:
    """Resource limits and JSON formatting rules for compiled constraints.

    `json_max_whitespace` caps the whitespace llguidance allows at each place JSON permits it
    (between tokens of the JSON text: after `{`, around `:` and `,`, before `}`...). It is matched
    at most once per place, so a model cannot loop on spaces until `max_tokens`; 0 forces
    compact JSON. The default (20) admits `json.dumps(indent=2)` style output nested 9 deep.
    Whitespace before the first or after the last byte of the JSON value is never allowed.

    The llguidance limits (`max_grammar_size`, `initial_lexer_fuel`, `step_lexer_fuel`,
    `step_max_items`, `max_lexer_states`, `max_items_in_row`) keep llguidance's defaults unless
    changed. `max_spec_bytes` bounds the regex / grammar / schema text, `max_choices` the number
    of choices. `cache_size` compiled grammars (by spec) are kept per compiler so a repeated
    schema compiles once; 0 disables the cache.

    Optional JSON bounds (None = off, the default): `json_max_string_length` (characters per
    string), `json_max_items` (per array), `json_max_properties` (per object),
    `json_max_integer_digits` (digits of an integer, and of a number's integer part: a
    `minimum`/`maximum` of -/+ (10**d - 1)) tighten every JSON Schema compiled (`tighten_schema`
    in compiler.py): they are added to the schema, never loosened, so whatever they admit still
    validates against the client's schema. They keep a model that repeats itself (small models
    do, greedily: the same array item or string fragment again and again, or "1000000..." digit
    after digit) from running to `max_tokens` with an unfinished value. Bounds that would contradict the schema (a `minLength` above the
    cap, ...) are not applied, and a schema that no longer compiles with them compiles with
    fewer of them (`json_bound_fallbacks`).
    """

    max_spec_bytes: int = 1 << 20
    max_choices: int = 4096
    json_max_whitespace: int = 20
    max_grammar_size: int = 500_000
    initial_lexer_fuel: int = 1_000_000
    step_lexer_fuel: int = 200_000
    step_max_items: int = 50_000
    max_lexer_states: int = 250_000
    max_items_in_row: int = 2000
    cache_size: int = 256
    mask_threads: int | None = None
    json_max_string_length: int | None = None
    json_max_items: int | None = None
    json_max_properties: int | None = None
    json_max_integer_digits: int | None = None

    def __post_init__(self) -> None:
        positive = (
            "max_spec_bytes",
            "max_choices",
            "max_grammar_size",
            "initial_lexer_fuel",
            "step_lexer_fuel",
            "step_max_items",
            "max_lexer_states",
            "max_items_in_row",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ConstraintLimits.{name} must be a positive integer, got {value!r}")
        for name in ("json_max_whitespace", "cache_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ConstraintLimits.{name} must be a non-negative integer, got {value!r}")
        for name in _JSON_BOUNDS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"ConstraintLimits.{name} must be a positive integer or None, got {value!r}")
        if self.mask_threads is not None and (not isinstance(self.mask_threads, int) or self.mask_threads <= 0):
            raise ValueError(f"ConstraintLimits.mask_threads must be a positive integer or None, got {self.mask_threads!r}")

    @property
    def bounds_json(self) -> bool:
        """Whether any optional JSON bound is set (schemas are tightened)."""
        return any(getattr(self, name) is not None for name in _JSON_BOUNDS)

    def without_json_bounds(self) -> "ConstraintLimits":
        """The same limits with the optional JSON bounds off."""
        return replace(self, **dict.fromkeys(_JSON_BOUNDS))

    def json_bound_fallbacks(self) -> list["ConstraintLimits"]:
        """The limits to compile a JSON schema with, in order, until one compiles: these; then
        without the property cap (llguidance counts properties only where every listed one is
        required, which a merged `allOf` can break); then without any JSON bound."""
        chain = [self]
        if self.json_max_properties is not None:
            chain.append(replace(self, json_max_properties=None))
        if self.bounds_json:
            chain.append(self.without_json_bounds())
        return list(dict.fromkeys(chain))

    def json_whitespace_pattern(self) -> str | None:
        """The regex llguidance matches (at most once) where JSON allows whitespace; None means
        no whitespace at all (compact JSON)."""
        if self.json_max_whitespace == 0:
            return None
        return r"[\x20\x0A\x0D\x09]{1,%d}" % self.json_max_whitespace
