"""The torch-free bottom layer every other layer shares: the stage-graph contract
(:mod:`.contract`), the typed manifest and bundle I/O (:mod:`.manifest`, :mod:`.bundle`),
gate-type metadata (:mod:`.gates`), the exit rule and its arithmetic (:mod:`.exits`),
input preprocessing, atomic file writes and the typed errors. It imports nothing above it."""
