"""The dots in a compiled XLA program's text, for tests of the dtypes its products take."""

import re


def hlo_dots(compiled_text: str) -> list:
    """Every dot in XLA's optimised HLO as (operand dtypes, lhs contracting dims, rhs
    contracting dims). On CPU each dot sits alone in a fusion, so its operands are that
    computation's parameters."""
    found = []
    for header, body in re.findall(r"^%[\w.\-]+ \((.*?)\) -> .*? \{\n(.*?)\n\}", compiled_text, re.M | re.S):
        for line in body.split("\n"):
            if " dot(" in line:
                dims = re.search(r"lhs_contracting_dims=\{(.*?)\}, rhs_contracting_dims=\{(.*?)\}", line)
                found.append((sorted(set(re.findall(r":\s*([a-z]+\d*)\[", header))), dims.group(1), dims.group(2)))
    assert len(found) == compiled_text.count(" dot("), "a dot outside a fusion"
    return found
