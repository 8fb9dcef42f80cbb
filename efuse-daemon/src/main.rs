//! The `efuse` binary: parses arguments and hands over to [`efuse::run`].
fn main() {
    std::process::exit(efuse::run(std::env::args_os().collect()));
}
