//! The smallest useful step: returns its input unchanged. Used to measure
//! the host's per-call overhead (new store, instantiate, call).

wit_bindgen::generate!({ path: "../../../wit", world: "step" });

struct Echo;

impl Guest for Echo {
    fn run(input: String) -> Result<String, String> {
        Ok(input)
    }
}

export!(Echo);
