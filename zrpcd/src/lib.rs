//! zrpcd (under construction).
