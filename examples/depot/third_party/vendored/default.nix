throw "third_party has .skip-tree: readTree must not read it"
