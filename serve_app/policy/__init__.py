"""Traffic policy: pure decisions the Router calls as named steps (testable without Ray)."""
