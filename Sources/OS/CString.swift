// C strings in fixed buffers (mkstemp templates, fgets lines, thread names).

extension String {
    /// The text before the first NUL of `chars` (all of it if there is none), decoded as
    /// UTF-8 with invalid bytes replaced.
    public init(nulTerminated chars: [CChar]) {
        self.init(decoding: chars.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
