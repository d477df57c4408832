throw "docs has .skip-subtree: readTree must not read docs/internal"
