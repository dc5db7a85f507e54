"""The error every teacher backend raises for a teacher it cannot build from local files."""


class TeacherError(ValueError):
    """A teacher that cannot be built from local files."""
