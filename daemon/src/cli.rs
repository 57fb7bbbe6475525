//! Command line. (owner: lead)
