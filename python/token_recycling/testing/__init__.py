"""What the tests check the library against: :mod:`.reference`, the plain PyTorch oracle of every
native op. Nothing on the decode path imports it."""
