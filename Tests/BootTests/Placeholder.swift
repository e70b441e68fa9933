import XCTest
@testable import Boot
