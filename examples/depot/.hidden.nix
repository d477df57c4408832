throw "hidden files are ignored"
