# Included after every project() call of the llama-cpp-python build (scripts/test.sh passes it as
# CMAKE_PROJECT_INCLUDE): when llama.cpp's own project starts, switch its `common` library off. llama-cpp-python's
# CMakeLists forces LLAMA_BUILD_COMMON ON for its multimodal library (mtmd, not built here: LLAVA_BUILD=OFF), and
# `import llama_cpp` loads only libllama and libggml; common (argument parsing, chat parsers, cpp-httplib with
# OpenSSL) was 46% of the compile time on 2 cores.
if(PROJECT_NAME STREQUAL "llama.cpp")
  set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama.cpp common library (not used by llama_cpp's Python bindings)" FORCE)
endif()
