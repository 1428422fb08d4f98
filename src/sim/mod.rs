//! NapCat simulator (being written).
