"""Chemical symbols by atomic number (IUPAC), so the core needs no ASE import."""

from __future__ import annotations

SYMBOLS: tuple[str, ...] = (
    "X",
    "H",
    "He",
    "Li",
    "Be",
    "B",
    "C",
    "N",
    "O",
    "F",
    "Ne",
    "Na",
    "Mg",
    "Al",
    "Si",
    "P",
    "S",
    "Cl",
    "Ar",
    "K",
    "Ca",
    "Sc",
    "Ti",
    "V",
    "Cr",
    "Mn",
    "Fe",
    "Co",
    "Ni",
    "Cu",
    "Zn",
    "Ga",
    "Ge",
    "As",
    "Se",
    "Br",
    "Kr",
    "Rb",
    "Sr",
    "Y",
    "Zr",
    "Nb",
    "Mo",
    "Tc",
    "Ru",
    "Rh",
    "Pd",
    "Ag",
    "Cd",
    "In",
    "Sn",
    "Sb",
    "Te",
    "I",
    "Xe",
    "Cs",
    "Ba",
    "La",
    "Ce",
    "Pr",
    "Nd",
    "Pm",
    "Sm",
    "Eu",
    "Gd",
    "Tb",
    "Dy",
    "Ho",
    "Er",
    "Tm",
    "Yb",
    "Lu",
    "Hf",
    "Ta",
    "W",
    "Re",
    "Os",
    "Ir",
    "Pt",
    "Au",
    "Hg",
    "Tl",
    "Pb",
    "Bi",
    "Po",
    "At",
    "Rn",
    "Fr",
    "Ra",
    "Ac",
    "Th",
    "Pa",
    "U",
    "Np",
    "Pu",
    "Am",
    "Cm",
    "Bk",
    "Cf",
    "Es",
    "Fm",
    "Md",
    "No",
    "Lr",
    "Rf",
    "Db",
    "Sg",
    "Bh",
    "Hs",
    "Mt",
    "Ds",
    "Rg",
    "Cn",
    "Nh",
    "Fl",
    "Mc",
    "Lv",
    "Ts",
    "Og",
)

NUMBERS: dict[str, int] = {symbol: z for z, symbol in enumerate(SYMBOLS) if z > 0}


def symbol(z: int) -> str:
    return SYMBOLS[int(z)] if 0 < int(z) < len(SYMBOLS) else f"Z={int(z)}"


def number(name: str) -> int:
    """Atomic number of a symbol ('Ar') or of a number given as text ('18')."""
    text = str(name).strip()
    if text.isdigit():
        return int(text)
    key = text[:1].upper() + text[1:].lower()
    if key not in NUMBERS:
        raise KeyError(f"unknown element {name!r}")
    return NUMBERS[key]


def formula(numbers) -> str:
    """Hill-ordered formula string such as 'C2H6O' or 'Ar13'."""
    counts: dict[int, int] = {}
    for z in numbers:
        counts[int(z)] = counts.get(int(z), 0) + 1
    keys = sorted(counts, key=lambda z: symbol(z))
    if 6 in counts:
        keys = [6] + ([1] if 1 in counts else []) + [z for z in keys if z not in (1, 6)]
    return "".join(symbol(z) + (str(counts[z]) if counts[z] > 1 else "") for z in keys)
