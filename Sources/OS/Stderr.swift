// Standard error without stdio's global FILE (which Swift 6 cannot prove thread-safe): one
// write(2) per line, as unbuffered stderr does.
import Glibc

/// Writes `text` to file descriptor 2, whole (retrying after EINTR and short writes); gives
/// up silently if stderr is gone.
public func writeStderr(_ text: String) {
    let utf8 = Array(text.utf8)
    var done = 0
    utf8.withUnsafeBytes { buf in
        while done < buf.count {
            let n = write(2, buf.baseAddress! + done, buf.count - done)
            if n > 0 {
                done += n
            } else if n < 0 && errno == EINTR {
                continue
            } else {
                return
            }
        }
    }
}
