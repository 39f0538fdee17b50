//! Pictures people look at: loss curves (and, later, labeled frame grids), image I/O.

pub mod plot;
