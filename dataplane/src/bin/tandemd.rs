//! tandemd: the Tandem cache server.
fn main() {
    eprintln!("tandemd: not built yet");
    std::process::exit(1);
}
